"""Replaying a recorded run: its calls re-decided against other policies, or re-issued."""
