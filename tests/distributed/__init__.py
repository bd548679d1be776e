"""Tests that launch several processes (torchrun, accelerate launch, the deepspeed launcher) and the scripts they launch."""
