"""A tiny CLIPSeg for tests, built through transformers' real classes and saved the way
``hf download CIDAS/clipseg-rd64-refined`` lays a model out (config, safetensors weights,
processor and CLIP BPE tokenizer files), so ``--clipseg-model local-dir:PATH`` reads it.

Its shapes follow rd64-refined's (three extract layers, FiLM at the first, the "complex"
transposed convolution) at toy sizes: 64x64 inputs, 8-pixel patches, 48-d ViT, 32-d text.
The tokenizer is CLIP's BPE with a small vocabulary (every byte, and the words tests use).
Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from tiny_clip import WORDS

TINY_CLIPSEG_SIZE = 64


def tiny_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(WORDS):
        parts = list(word)
        parts[-1] += "</w>"
        current = parts[0]
        for part in parts[1:]:
            if (current, part) not in merges:
                merges.append((current, part))
            current += part
            vocab.setdefault(current, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_clipseg_config(vocab_size: int, tokenizer=None):
    from transformers import CLIPSegConfig

    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return CLIPSegConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 16, **ids},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 4,
                       "num_attention_heads": 3, "image_size": TINY_CLIPSEG_SIZE,
                       "patch_size": 8},
        projection_dim=32, extract_layers=[1, 2, 3], reduce_dim=16,
        decoder_num_attention_heads=2, decoder_intermediate_size=32,
        use_complex_transposed_convolution=True)


def write_tiny_clipseg_dir(folder: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny CLIPSeg folder (random weights, seeded); returns it."""
    import torch
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    image_processor = ViTImageProcessor(
        size={"height": TINY_CLIPSEG_SIZE, "width": TINY_CLIPSEG_SIZE},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(tiny_clipseg_config(len(tokenizer), tokenizer))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
