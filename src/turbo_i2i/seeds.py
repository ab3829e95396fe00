"""The seeds torch's random generators take, in a module without heavy imports so option parsing can check them."""

SEEDS = range(-(2**63), 2**64)  # what torch.Generator.manual_seed takes: any int64 or uint64
