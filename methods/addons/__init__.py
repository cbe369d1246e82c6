"""Add-ons a distillation method may host: terms and learned state beside the synthetic images
that work with several methods (the CLoM regulariser, privileged feature labels)."""
