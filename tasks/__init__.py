"""Importing `tasks` registers every SeqIO task and mixture (idempotent)."""
from tasks import synthetic

synthetic.register()
