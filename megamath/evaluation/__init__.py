"""Few-shot problem solving as LLEMMA evaluated it: tasks (prompt, answer extraction, correctness), majority
voting, the evaluation run behind `megamath eval`, and the hook that runs it during training."""
