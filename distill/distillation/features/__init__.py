"""Feature and relation distillation: terms computed from the student's and the teacher's
intermediate outputs (taken with forward hooks), added to the logit loss, each with its own weight."""
