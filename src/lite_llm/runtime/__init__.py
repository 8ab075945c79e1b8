"""Process-level tuning that lives outside the model: how this process uses CPU memory and threads,
and which device it computes on.  Nothing here changes what a model computes."""
