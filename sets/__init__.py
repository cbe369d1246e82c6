"""What happens to a finished synthetic set: its files (ours and the reference layouts), assessment
on original models, comparison tables, continual learning and cost records. Nothing here knows a
distillation method."""
