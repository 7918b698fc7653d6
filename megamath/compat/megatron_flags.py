"""The Megatron-LM flags `config from-megatron` does not map, each with why, and those it refuses.

KNOWN_UNMAPPED and INERT_FAMILIES are listed at the end of a conversion (not needed, no equivalent, or
unsupported with the consequence); LEGACY_FLAGS, OTHER_TRAINING and MODEL_CHANGES are refused, since a
config converted without them would train another run or another model. `megamath convert megatron-to-hf`
refuses a checkpoint whose args set one of MODEL_CHANGES too. The tables were checked against every flag of
Megatron-LM's own parser (main of 2026-08-22): the flags still unknown are infrastructure ones.
"""
from megamath.compat.conversion import NO_EQUIVALENT, NOT_NEEDED, UNSUPPORTED, UnmappedTable

KNOWN_UNMAPPED = {
    **{k: (NOT_NEEDED, "megamath's kernels are always fused (Triton RMSNorm, RoPE, FlashAttention, SwiGLU, "
                       "streaming cross-entropy)")
       for k in ("use_flash_attn", "no_masked_softmax_fusion", "no_bias_gelu_fusion", "no_bias_swiglu_fusion",
                 "no_bias_dropout_fusion", "no_rope_fusion",
                 "attention_softmax_in_fp32", "apply_query_key_layer_scaling", "cross_entropy_loss_fusion",
                 "masked_softmax_fusion", "use_fused_rmsnorm", "transformer_impl", "use_mcore_models",
                 "use_legacy_models", "attention_backend", "no_persist_layer_norm", "bias_swiglu_fusion")},
    "use_distributed_optimizer": (NOT_NEEDED, "megamath always shards the optimizer state over data-parallel "
                                              "ranks (ZeRO-1), as Megatron's distributed optimizer does"),
    **{k: (NOT_NEEDED, "megamath's ZeRO-1 buckets its flat buffers (parallel.bucket_mb) and overlaps their "
                       "reduce-scatter and all-gather with compute (parallel.overlap_grad_reduce / "
                       "overlap_param_gather, on by default)")
       for k in ("overlap_grad_reduce", "overlap_param_gather", "overlap_param_gather_with_optimizer_step",
                 "ddp_bucket_size", "ddp_average_in_collective", "align_grad_reduce", "align_param_gather")},
    "tp_comm_overlap": (NO_EQUIVALENT, "megamath's tensor-parallel collectives are not overlapped with compute"),
    "num_workers": (NOT_NEEDED, "samples are read in the training process (memory-mapped, no loader workers)"),
    "distributed_backend": (NOT_NEEDED, "NCCL on GPUs, gloo on CPUs, chosen by megamath"),
    "exit_signal_handler": (NOT_NEEDED, "megamath always saves and exits 0 on SIGTERM or SIGUSR1"),
    "wandb_save_dir": (NOT_NEEDED, "W&B writes under run_dir"),
    "no_load_optim": (NOT_NEEDED, "init_from_hf loads the weights only"),
    "no_load_rng": (NOT_NEEDED, "init_from_hf loads the weights only"),
    "finetune": (NOT_NEEDED, "init_from_hf loads the weights only and starts at step 0"),
    "ckpt_format": (NOT_NEEDED, "megamath checkpoints are sharded safetensors + torch files per rank"),
    "use_checkpoint_args": (NOT_NEEDED, "the config is the source of the model's shape"),
    "seq_length_for_eval": (NOT_NEEDED, "validation uses data.seq_length"),
    "data_cache_path": (NOT_NEEDED, "set data.cache_dir (default RUN_DIR/index-cache)"),
    "log_throughput": (NOT_NEEDED, "metrics.jsonl records tokens/s, TFLOP/s and MFU every step"),
    **{k: (NOT_NEEDED, "metrics.jsonl records loss, lr, grad norm, throughput and memory every step")
       for k in ("log_timers_to_tensorboard", "log_validation_ppl_to_tensorboard", "log_memory_to_tensorboard",
                 "log_num_zeros_in_grad", "log_params_norm", "timing_log_level", "log_progress",
                 "tensorboard_log_interval", "log_world_size_to_tensorboard", "log_loss_scale_to_tensorboard",
                 "log_batch_size_to_tensorboard", "log_learning_rate_to_tensorboard")},
    **{k: (UNSUPPORTED, "megamath's matrix multiplies run in bfloat16 (no FP8 recipe): more memory and time, "
                        "slightly different numerics")
       for k in ("fp8_format", "fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo",
                 "fp8_param_gather", "fp8_margin")},
    "calculate_per_token_loss": (NOT_NEEDED, "megamath's micro-batches hold the same number of tokens each, all in "
                                             "the loss, so the mean over micro-batches is the mean per token"),
    **{k: (NOT_NEEDED, "only used to build the tokenizer's vocabulary; megamath reads token ids")
       for k in ("vocab_file", "merge_file")},
    **{k: (NOT_NEEDED, "megamath checkpoints are sharded safetensors + torch files per rank, read at any TP or DP "
                       "size")
       for k in ("use_dist_ckpt", "dist_ckpt_format", "auto_detect_ckpt_format", "ckpt_fully_parallel_save",
                 "ckpt_fully_parallel_load", "ckpt_assume_constant_structure", "dist_ckpt_strictness",
                 "ckpt_convert_format")},
    "async_save": (NO_EQUIVALENT, "megamath saves synchronously: each rank writes its share, then the checkpoint is "
                                  "verified and published"),
    **{k: (NO_EQUIVALENT, "megamath's checkpoints always hold the optimizer and RNG states (a resume needs them); "
                          "`megamath convert megamath-to-hf` writes the weights alone")
       for k in ("no_save_optim", "no_save_rng")},
    "override_opt_param_scheduler": (NOT_NEEDED, "a resume takes the config's schedule, with a warning naming each "
                                                 "change"),
    "use_checkpoint_opt_param_scheduler": (NO_EQUIVALENT, "a resume takes the config's schedule, not the "
                                                          "checkpoint's (a warning names each change)"),
    "profile_ranks": (NOT_NEEDED, "megamath traces every rank (Megatron-LM: rank 0 by default)"),
    **{k: (NOT_NEEDED, "read only with --profile") for k in ("profile_step_start", "profile_step_end",
                                                              "use_pytorch_profiler")},
    **{k: (NOT_NEEDED, "megamath's trace records what its kernel summary needs (no shapes, stacks or execution "
                       "traces)")
       for k in ("pytorch_profiler_collect_shapes", "pytorch_profiler_collect_callstack",
                 "pytorch_profiler_collect_chakra", "record_shapes", "nvtx_ranges")},
    "memory_snapshot_path": (NOT_NEEDED, "snapshots go to RUN_DIR/profile/memory_step{s}_rank{r}.pickle"),
    **{k: (NOT_NEEDED, "a pipeline layout; megamath has no pipeline parallelism")
       for k in ("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank",
                 "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                 "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                 "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                 "account_for_loss_in_pipeline_split")},
    **{k: (NOT_NEEDED, "settings of multi-latent attention, which megamath refuses: inert without "
                       "--multi-latent-attention")
       for k in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
                 "rotary_scaling_factor", "mscale", "mscale_all_dim", "cache_mla_latents", "mla_down_proj_fusion")},
    "rope_scaling_factor": (NOT_NEEDED, "read only with --use-rope-scaling, which megamath refuses"),
    **{k: (NO_EQUIVALENT, "megamath leaves Python's garbage collector on")
       for k in ("manual_gc", "manual_gc_interval", "no_manual_gc_eval")},
    **{k: (UNSUPPORTED, "megamath initializes every weight normal(0, init_std), output projections scaled, alike on "
                        "every rank; only a run from random weights is affected")
       for k in ("embedding_init_method_std", "init_method_xavier_uniform", "data_parallel_random_init")},
    **{k: (UNSUPPORTED, "megamath's optimizer keeps fp32 master weights and moments (optimizer.grad_dtype sets the "
                        "gradient buffer's): more memory, the exact update")
       for k in ("use_precision_aware_optimizer", "main_grads_dtype", "main_params_dtype", "exp_avg_dtype",
                 "exp_avg_sq_dtype", "optimizer_cpu_offload", "optimizer_offload_fraction")},
    **{k: (UNSUPPORTED, "megamath shards the optimizer state (ZeRO-1); parameters and gradients stay whole on each "
                        "data-parallel rank: more memory, the same updates")
       for k in ("use_torch_fsdp2", "use_megatron_fsdp", "data_parallel_sharding_strategy")},
    **{k: (NO_EQUIVALENT, "each validation set is evaluated on eval_batches micro-batches of the training size "
                          "every eval_every steps")
       for k in ("eval_micro_batch_size", "eval_global_batch_size", "full_validation", "start_eval_at_iter")},
    **{k: (NOT_NEEDED, "megamath evaluates and reports each validation set on its own")
       for k in ("multiple_validation_sets", "validation_set_names")},
    "exit_signal": (NOT_NEEDED, "megamath saves and stops on SIGTERM and SIGUSR1"),
    **{k: (NO_EQUIVALENT, "Megatron-LM's rerun machine; megamath skips a step with a non-finite loss or gradient "
                          "norm and stops after max_consecutive_nonfinite in a row")
       for k in ("check_for_spiky_loss", "check_for_large_grads", "result_rejected_tracker_filename",
                 "error_injection_rate", "error_injection_type")},
    "no_weight_decay_cond_type": (NOT_NEEDED, "its one choice decays q/k layernorms, which megamath refuses"),
    "apply_wd_to_qk_layernorm": (NOT_NEEDED, "q/k layernorms, which megamath refuses"),
    "empty_unused_memory_level": (NOT_NEEDED, "megamath leaves PyTorch's caching allocator alone (no "
                                              "empty_cache calls in the step)"),
    "no_create_attention_mask_in_dataloader": (NOT_NEEDED, "megamath's attention is causal without a mask tensor"),
    "deterministic_mode": (NO_EQUIVALENT, "megamath has no such switch (its attention leaves atomic and "
                                          "non-deterministic backends out only under "
                                          "torch.use_deterministic_algorithms)"),
    **{k: (NOT_NEEDED, "each rank initializes its own shard on its device") for k in (
        "use_cpu_initialization", "no_initialization", "init_model_with_meta_device")},
    **{k: (NOT_NEEDED, "read only with fp16 loss scaling; megamath trains in bfloat16 without it")
       for k in ("loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis",
                 "fp16_lm_cross_entropy")},
    "no_position_embedding": (NOT_NEEDED, "megamath has no learned position embedding (RoPE only)"),
    "fp32_residual_connection": (UNSUPPORTED, "megamath keeps the residual stream in the parameter dtype"),
    **{k: (NOT_NEEDED, "megamath skips a step with a non-finite loss or gradient norm and stops after "
                       "max_consecutive_nonfinite of them in a row")
       for k in ("check_for_nan_in_loss_and_grad", "no_check_for_nan_in_loss_and_grad")},
    **{k: (NOT_NEEDED, "samples are memory-mapped and read in the training process, in an order fixed by the step")
       for k in ("dataloader_type", "num_dataset_builder_threads", "no_mmap_bin_files")},
    **{k: (NOT_NEEDED, "metrics.jsonl records each step's time per phase and the slowest rank")
       for k in ("log_straggler", "straggler_minmax_count", "barrier_with_L1_time", "logging_level",
                 "tensorboard_queue_size")},
}
LEGACY_FLAGS = {"model_parallel_size": "--tensor-model-parallel-size", "batch_size": "--micro-batch-size",
                "warmup": "--lr-warmup-fraction", "checkpoint_activations": "--recompute-activations"}
"""Flags of old Megatron-LM scripts that Megatron-LM now stops on: a script with one does not run there."""
OTHER_TRAINING = {"freeze_all_layers": "no weight (every layer frozen)",
                  "fim_data": "fill-in-the-middle rearranged samples", "sft": "supervised fine-tuning (prompts "
                  "left out of the loss)", "perform_rl_step": "reinforcement learning (GRPO)"}
"""Switches whose run trains on something other than the blend's tokens, or trains nothing."""
# Prefixes of settings that only act with a switch megamath refuses (a dense Llama ignores them).
INERT_FAMILIES = {
    "moe_": "MoE settings: inert without --num-experts (megamath trains dense models)",
    "mamba_": "Mamba settings: inert without hybrid layers (megamath trains Llama layers)",
    "mtp_": "multi-token prediction settings: inert without --mtp-num-layers",
    "dsa_": "sparse-attention indexer settings: inert without that attention variant",
    "yarn_": "YaRN settings: inert without --position-embedding-type yarn",
    "mup_": "muP settings: inert without --use-mup",
    "mhc_": "hyper-connection settings: inert without --enable-mhc-connections",
    "linear_": "linear-attention settings: inert without --linear-attention-freq",
    "fim_": "fill-in-the-middle settings: inert without --fim-data, which megamath refuses",
    "lr_wsd_": "warmup-stable-decay settings: inert without --lr-decay-style WSD, which megamath refuses",
    "sft_": "supervised fine-tuning settings: inert without --sft, which megamath refuses",
    "rl_": "reinforcement-learning settings: inert without --perform-rl-step, which megamath refuses",
    "grpo_": "reinforcement-learning settings: inert without --perform-rl-step, which megamath refuses",
    "muon_": "settings of another optimizer than Adam (--optimizer), which megamath refuses",
    "lion_": "settings of another optimizer than Adam (--optimizer), which megamath refuses",
    "sgd_": "settings of another optimizer than Adam (--optimizer), which megamath refuses",
    "fp8_": "FP8 settings: inert without --fp8-format, which megamath does not train",
    "fp4_": "FP4 settings: megamath's matrix multiplies run in bfloat16",
    "inference_": "inference-server settings, not training",
    "tp_comm_": "tensor-parallel communication overlap (Transformer Engine); megamath's TP collectives are not "
                "overlapped with compute",
    "cuda_graph": "CUDA graphs; megamath's step is not captured in one",
    "inprocess_": "Megatron-LM's in-process restart; megamath is restarted by the job and resumes from its latest "
                  "checkpoint",
    "fault_injector_": "fault injection, a test aid",
    "one_logger": "NVIDIA's one-logger telemetry; metrics.jsonl is megamath's record",
    "otel_": "OpenTelemetry tracing; metrics.jsonl is megamath's record",
    "flight_recorder": "NCCL flight recorder dumps",
    "logits_": "logit dumping for distillation, not training",
    "async_ckpt": "asynchronous checkpointing, which megamath does not do (each save is synchronous)",
    "ckpt_": "Megatron-LM checkpoint-format settings; megamath writes its own format",
    "non_persistent_": "Megatron-LM's non-persistent (local) checkpoints; megamath saves every checkpoint.save_every "
                       "steps to RUN_DIR",
    "dataloader_": "Megatron-LM data-loader tuning; megamath memory-maps its datasets in the training process",
    "tokenizer_": "tokenizer settings; megamath reads token ids from the preprocessed datasets",
    "tiktoken_": "tokenizer settings; megamath reads token ids from the preprocessed datasets",
    "null_tokenizer_": "tokenizer settings; megamath reads token ids from the preprocessed datasets",
    "megatron_fsdp": "FSDP settings; megamath shards the optimizer state (ZeRO-1)",
    "fsdp_": "FSDP settings; megamath shards the optimizer state (ZeRO-1)",
    **{k: "a vision, retrieval or BERT model's setting, not a GPT's"
       for k in ("dino_", "ict_", "biencoder_", "retriever_", "vision_", "bert_", "img_")},
}
# Flags that change the model a Llama is (Megatron-LM's defaults leave it one): {flag: (values that change
# nothing, what it trains instead)}. Listed as "no equivalent", each would convert into another model; a checkpoint
# whose args set one is refused too (megatron_llama).
MODEL_CHANGES = {
    **{k: ((), "sliding-window attention") for k in ("window_size", "window_attn_skip_freq")},
    "softmax_scale": ((), "another attention scale than 1/sqrt(head_dim)"),
    "softmax_type": (("vanilla",), "another attention softmax"),
    "multi_latent_attention": ((), "multi-latent attention"),
    "experimental_attention_variant": ((), "another attention"),
    "linear_attention_freq": ((), "linear-attention layers"),
    "qk_l2_norm": ((), "L2-normalized queries and keys"),
    "qk_clip": ((), "clipped query and key weights"),
    "attention_output_gate": ((), "a gated attention output"),
    "no_rope_freq": ((), "layers without RoPE"),
    "mrope_section": ((), "multimodal RoPE"),
    **{k: ((), "another activation than SwiGLU") for k in ("squared_relu", "openai_gelu", "quick_geglu")},
    "glu_linear_offset": (("0", "0.0"), "an offset GLU"),
    "activation_func_clamp_value": ((), "a clamped activation"),
    "use_mup": ((), "muP's width scaling"),
    "enable_mhc_connections": ((), "hyper-connections between layers"),
    **{k: ((), "Mamba/hybrid layers") for k in ("is_hybrid_model", "hybrid_layer_pattern", "hybrid_override_pattern")},
    "mtp_num_layers": (("0",), "multi-token prediction layers and their loss"),
    **{k: ((), "layers of different shapes")
       for k in ("heterogeneous_layers_config_path", "heterogeneous_layers_config_encoded_json")},
    "spec": ((), "a custom layer spec"),
}
UNMAPPED = UnmappedTable(KNOWN_UNMAPPED, INERT_FAMILIES)
