"""distill: teacher-student knowledge distillation with compression (see README "Architecture")."""
