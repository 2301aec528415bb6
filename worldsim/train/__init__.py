"""World-model training: the loop (`trainer`), checkpoints with exact resume (`checkpoint`), the
EMA of the weights (`ema`) and torchrun / DDP support (`distributed`).

Deliberately no imports here: importing one module does not pull in the others (or torch.distributed).
"""
