"""fescale's training stages on Ray Train + DeepSpeed (Feedback SFT, Edit SFT, Edit RM, Edit RLOO, distillation SFT)."""
