"""Run tools (run as python3 scripts/<tool>.py); scripts.runlog reads train_gpt.py logs."""
