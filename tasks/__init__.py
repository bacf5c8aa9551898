"""Importing `tasks` registers every SeqIO task and mixture (idempotent)."""
from tasks import (bolt, hh_rlhf, mixtures, prepared, shp, synthetic, taskmaster,
                   tldr, trl_format)

synthetic.register()
taskmaster.register()
hh_rlhf.register()
tldr.register()
shp.register()
bolt.register()
trl_format.register()
prepared.register()  # after the tasks it prepares
mixtures.register()
