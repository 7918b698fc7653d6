"""The GPT-NeoX keys `config from-neox` does not map, each with why.

KNOWN_UNMAPPED and INERT_FAMILIES are listed at the end of a conversion (not needed, no equivalent, or
unsupported with the consequence); what megamath cannot train is refused in neox.py itself. The tables were
checked against every key of GPT-NeoX's NeoXArgs, main and the llemma branch: each is mapped, refused or here.
"""
from megamath.compat.conversion import NO_EQUIVALENT, NOT_NEEDED, UNSUPPORTED, UnmappedTable

KNOWN_UNMAPPED = {
    **{k: (NOT_NEEDED, "megamath's kernels are always fused (Triton RMSNorm, RoPE, FlashAttention, SwiGLU, "
                       "streaming cross-entropy)")
       for k in ("scaled_upper_triang_masked_softmax_fusion", "scaled_masked_softmax_fusion", "bias_gelu_fusion",
                 "bias_dropout_fusion", "fp16_lm_cross_entropy", "attention_softmax_in_fp32", "use_flashattn_swiglu",
                 "rope_fusion")},
    "clip_grad": (NOT_NEEDED, "GPT-NeoX overwrites it with gradient_clipping, which sets optimizer.clip_grad"),
    "apply_query_key_layer_scaling": (NOT_NEEDED, "rescales inside the fp16 softmax only; the result is the same"),
    "output_layer_parallelism": (NOT_NEEDED, "megamath's LM head is always vocabulary-parallel over the TP ranks "
                                             "(same numbers either way)"),
    "data_impl": (NOT_NEEDED, "megamath reads Megatron's mmap .bin/.idx datasets"),
    "mmap_warmup": (NOT_NEEDED, "datasets are memory-mapped on demand"),
    "num_workers": (NOT_NEEDED, "samples are read in the training process (memory-mapped, no loader workers)"),
    "use_shared_fs": (NOT_NEEDED, "sample indices are built by rank 0 and cached under RUN_DIR (or data.cache_dir)"),
    "short_seq_prob": (NOT_NEEDED, "BERT-only"),
    "synchronize_each_layer": (NOT_NEEDED, "a DeepSpeed debugging aid"),
    "contiguous_checkpointing": (NOT_NEEDED, "a DeepSpeed memory layout option"),
    "deepspeed_activation_checkpointing": (NOT_NEEDED, "megamath checkpoints with torch.utils.checkpoint"),
    "partition_activations": (NO_EQUIVALENT, "checkpointed activations are not split over the TP ranks; "
                                             "parallel.sequence_parallel=true saves that memory instead"),
    "checkpoint_in_cpu": (UNSUPPORTED, "checkpointed activations stay on the GPU (more GPU memory)"),
    "checkpoint_validation_with_forward_pass": (NO_EQUIVALENT, "checkpoints are verified by the exact-resume "
                                                               "tests instead"),
    "override_lr_scheduler": (NOT_NEEDED, "the schedule is always recomputed from the config on resume"),
    "use_checkpoint_lr_scheduler": (NOT_NEEDED, "the schedule is always recomputed from the config on resume"),
    "no_save_optim": (NO_EQUIVALENT, "checkpoints always hold the optimizer shards (exact resume)"),
    "no_save_rng": (NO_EQUIVALENT, "checkpoints always hold the RNG states (exact resume)"),
    "no_load_optim": (NO_EQUIVALENT, "init_from_hf loads weights only; a megamath checkpoint resumes everything"),
    "no_load_rng": (NO_EQUIVALENT, "a megamath checkpoint resumes everything"),
    "extra_save_iters": (NO_EQUIVALENT, "checkpoints are saved every checkpoint.save_every steps, at the end and "
                                        "on SIGTERM/SIGUSR1"),
    "s3_path": (NO_EQUIVALENT, "checkpoints are written to RUN_DIR only; copy them with your own tools"),
    "s3_chunk_size": (NO_EQUIVALENT, "checkpoints are written to RUN_DIR only"),
    "valid_data_weights": (NOT_NEEDED, "each validation set is evaluated and reported on its own"),
    "test_data_weights": (NOT_NEEDED, "each test set is evaluated and reported on its own"),
    "distributed_backend": (NOT_NEEDED, "NCCL on GPUs, gloo on CPUs, chosen by megamath"),
    "steps_per_print": (NOT_NEEDED, "DeepSpeed's console print; see log_every"),
    "wall_clock_breakdown": (NOT_NEEDED, "metrics.jsonl records step time, tokens/s, TFLOP/s and MFU every step"),
    "log_dir": (NOT_NEEDED, "everything goes to run_dir (metrics.jsonl, config.yaml)"),
    "wandb_init_all_ranks": (NOT_NEEDED, "only rank 0 logs"),
    "git_hash": (NOT_NEEDED, "bookkeeping"),
    "config_files": (NOT_NEEDED, "bookkeeping"),
    "user_script": (NOT_NEEDED, "megamath train is the script"),
    "global_num_gpus": (NOT_NEEDED, "the world size comes from torchrun"),
    "world_size": (NOT_NEEDED, "the world size comes from torchrun"),
    **{k: (NOT_NEEDED, "megamath runs under torchrun; on SLURM see examples/launch_slurm.sbatch")
       for k in ("launcher", "deepspeed_slurm", "deepspeed_mpi", "hostfile", "include", "exclude", "num_nodes",
                 "num_gpus", "master_port", "master_addr", "force_multi", "detect_nvlink_pairs", "comment",
                 "account", "no_ssh_check", "local_rank", "rank")},
    **{k: (NO_EQUIVALENT, "extra training diagnostics; metrics.jsonl logs loss, lr and the global grad norm")
       for k in ("log_grad_pct_zeros", "log_param_norm", "log_grad_norm", "log_optimizer_states",
                 "log_gradient_noise_scale", "gradient_noise_scale_n_batches", "gradient_noise_scale_cpu_offload")},
    **{k: (NOT_NEEDED, "text generation and evaluation-harness settings, not training")
       for k in ("text_gen_type", "temperature", "top_p", "top_k", "return_logits", "maximum_tokens", "prompt_end",
                 "sample_input_file", "sample_output_file", "num_samples", "recompute", "eval_results_prefix",
                 "eval_tasks")},
    **{k: (NOT_NEEDED, "megamath's kernels are its own (Triton, fused); TransformerEngine layers compute the same "
                       "model")
       for k in ("te_columnparallel", "te_rowparallel", "te_layernorm_mlp", "te_mha", "layernorm_fusion",
                 "rmsnorm_fusion", "fused_kernels_build_path")},
    **{k: (NOT_NEEDED, "read only with TransformerEngine's FP8, which megamath has not (bfloat16 matmuls)")
       for k in ("te_fp8_format", "te_fp8_wgrad", "te_fp8_amax_history_len", "te_fp8_amax_compute_algo",
                 "te_fp8_margin", "te_fp8_mha")},
    **{k: (NOT_NEEDED, "settings of a position embedding, norm or layer type megamath refuses: inert here")
       for k in ("layernorm_epsilon", "scalenorm_epsilon", "rpe_num_buckets", "rpe_max_distance", "opt_pos_emb_offset",
                 "sparsity_config", "sparse_attention", "gmlp_attn_dim", "dim_att", "head_size", "ffn_dim")},
    **{k: (NOT_NEEDED, "read only with another train_impl than normal, which megamath refuses")
       for k in ("dpo_fp32", "dpo_reference_free", "dpo_beta", "kto_fp32", "kto_desirable_weight",
                 "kto_undesirable_weight", "kto_beta", "z_loss", "fp32_reinforce", "kl_impl", "kl_div_beta",
                 "reinforce_leave_one_out", "precompute_model_name")},
    **{k: (NOT_NEEDED, "the data of preference or reward training (train_impl), which megamath refuses")
       for k in ("train_label_data_paths", "train_reward_data_paths", "test_label_data_paths", "test_reward_data_paths",
                 "valid_label_data_paths", "valid_reward_data_paths", "pos_train_data_paths", "neg_train_data_paths",
                 "pos_train_label_data_paths", "neg_train_label_data_paths", "pos_valid_data_paths",
                 "neg_valid_data_paths", "pos_valid_label_data_paths", "neg_valid_label_data_paths",
                 "pos_test_data_paths", "neg_test_data_paths", "pos_test_label_data_paths",
                 "neg_test_label_data_paths", "online_dataserver_ips", "online_dataserver_ports",
                 "serve_model_weights", "weight_server_port")},
    "weighted_sampler_alpha": (NOT_NEEDED, "read only with weight_by_num_documents, which megamath refuses"),
    **{k: (NOT_NEEDED, "settings of muP, which megamath refuses (use_mup): inert here")
       for k in ("mup_init_scale", "mup_attn_temp", "mup_output_temp", "mup_embedding_mult", "mup_rp_embedding_mult",
                 "mup_width_scale", "coord_check", "save_base_shapes", "base_shapes_file")},
    **{k: (NOT_NEEDED, "fp16 loss scaling; megamath trains in bfloat16 without it")
       for k in ("hysteresis", "dynamic_loss_scale", "loss_scale", "loss_scale_window", "min_scale", "amp")},
    "profile_backward": (NOT_NEEDED, "megamath's trace covers the whole step, backward included"),
    "memory_profiling_path": (NOT_NEEDED, "snapshots go to RUN_DIR/profile/memory_step{s}_rank{r}.pickle"),
    **{k: (NOT_NEEDED, "read only with profile: true") for k in ("profile_step_start", "profile_step_stop")},
    "peak_theoretical_tflops": (NOT_NEEDED, "metrics.peak_tflops sets MFU's peak when the GPU table lacks the card"),
    "rotary_save_freqs_buffer": (NOT_NEEDED, "megamath computes RoPE's frequencies in its kernels (none saved)"),
    "use_cpu_initialization": (NOT_NEEDED, "each rank initializes its own shard on its device"),
    "char_level_ppl": (NO_EQUIVALENT, "metrics.jsonl reports the loss per token"),
    **{k: (NOT_NEEDED, "DeepSpeed engine settings; megamath runs its own loop under torchrun")
       for k in ("deepspeed", "deepspeed_extra_args", "prescale_gradients", "gradient_predivide_factor",
                 "sparse_gradients", "dump_state", "flops_profiler", "communication_data_type", "autotuning",
                 "autotuning_run", "activation_checkpointing", "data_efficiency", "tensorboard", "wandb",
                 "csv_monitor", "elasticity", "comms_logger", "compression_training", "checkpoint", "deepscale",
                 "deepscale_config")},
    **{k: (NOT_NEEDED, "GPT-NeoX derives it at start-up; a config does not set it")
       for k in ("iteration", "do_train", "do_valid", "do_test", "warning", "is_pipe_parallel")},
    **{k: (NOT_NEEDED, "megamath resumes from RUN_DIR/checkpoints/latest on any restart (checkpoint.resume auto)")
       for k in ("adlr_autoresume", "adlr_autoresume_interval")},
    "lazy_mpu_init": (NOT_NEEDED, "the process groups are set up by torchrun and megamath at start-up"),
    "onnx_safe": (NOT_NEEDED, "an ONNX export setting, not training"),
    "pipe_partition_method": (NOT_NEEDED, "a pipeline layout; megamath has no pipeline parallelism"),
    "curriculum_seqlen": (NOT_NEEDED, "read only with curriculum_learning, which megamath refuses"),
    "batch_size": (NOT_NEEDED, "an alias of train_micro_batch_size_per_gpu, which is set"),
    "gas": (NOT_NEEDED, "an alias of gradient_accumulation_steps, which is set"),
    "save_iters": (NOT_NEEDED, "GPT-NeoX derives it from checkpoint_factor (checkpoint.save_every)"),
    "use_comet": (NO_EQUIVALENT, "Comet ML logging; megamath writes metrics.jsonl, TensorBoard and W&B"),
    **{k: (NO_EQUIVALENT, "a GPT-NeoX main key (read with activation swiglu); this config's MLP is the llemma "
                          "branch's (mlp_type llama)")
       for k in ("mlp_multiple_of", "expansion_factor", "use_bias_in_mlp")},
    "optimizer_type": (NOT_NEEDED, "GPT-NeoX derives it from optimizer.type, which sets megamath's optimizer"),
    "use_bnb_optimizer": (UNSUPPORTED, "megamath's AdamW keeps fp32 moments (no 8-bit bitsandbytes Adam): more "
                                       "memory, the exact update"),
    "scheduler": (NO_EQUIVALENT, "a DeepSpeed learning-rate scheduler; megamath's schedule comes from GPT-NeoX's lr "
                                 "keys (schedule.*)"),
}
NULL_IS_UNSET = {"exit_interval", "batch_size", "gas", "save_interval"}
"""Integer keys GPT-NeoX defaults to null (unset, their alias or 0 counts instead): null there is no error."""
# Prefixes of settings that only act with a switch megamath refuses (a dense Llama ignores them).
INERT_FAMILIES = {
    "moe_": "MoE settings: inert without moe_num_experts > 1 (megamath trains dense models)",
    "mamba_": "Mamba settings: inert without Mamba layers in attention_config",
    "comet_": "Comet ML logging, which megamath has not (metrics.jsonl, TensorBoard, W&B)",
}
UNMAPPED = UnmappedTable(KNOWN_UNMAPPED, INERT_FAMILIES)
