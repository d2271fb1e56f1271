"""Post-training on the pre-training stack: SFT (sft.py) is the Trainer with a chat-data loader and a pre-trained
checkpoint as its initial weights; the instruction task and evaluation live in tasks.py and evaluate.py."""
