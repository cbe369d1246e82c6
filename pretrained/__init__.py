"""Networks trained on real data: expert trajectories and their replay buffers (``buffers``,
``experts``), per-sample difficulty scores (``scores``) and the original models of the CLoM
regulariser and the assessments (``originals``). Nothing here knows a distillation method."""
