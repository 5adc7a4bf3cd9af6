"""Teacher and student networks by name (the `teacher=` / `student=` groups)."""
