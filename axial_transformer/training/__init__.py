"""Training with Hugging Face Accelerate: the run's config (config.py), the loop (loop.py), one
optimizer step (step.py), start-up checks (startup.py), checkpoints and resume (checkpoint.py,
resume.py, optimizer_state.py), signals (signals.py) and what a run reports (run_log.py)."""
