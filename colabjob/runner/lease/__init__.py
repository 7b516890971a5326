"""One live runner per job: ``claim`` is this runner's lease and fencing epoch, ``info`` reads
the lease file as anyone may (who holds a job, is it alive)."""
