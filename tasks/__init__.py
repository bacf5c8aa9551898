"""Importing `tasks` registers every SeqIO task and mixture (idempotent)."""
from tasks import hh_rlhf, synthetic, taskmaster

synthetic.register()
taskmaster.register()
hh_rlhf.register()
