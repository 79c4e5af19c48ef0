"""Tiny random-init Hugging Face CLIP and SigLIP models, and a CLIP tokenizer, built offline (the root
conftest's ``hf_tiny`` fixture; it skips a test when ``transformers`` is not installed).

The tokenizer is ``transformers.CLIPTokenizer`` on open_clip's bundled BPE merges (the same as OpenAI's
CLIP: 49408 tokens, start 49406, end 49407), so prompts tokenize as for a released CLIP.
"""

import gzip
from functools import cache

import torch
import transformers

CONTEXT_LENGTH = 32
VOCAB = 49408


@cache
def clip_tokenizer():
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as file:
        merges = file.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    bytes_ = list(bytes_to_unicode().values())
    vocab = [*bytes_, *(b + "</w>" for b in bytes_), *("".join(m.split()) for m in merges)]
    vocab = [*vocab, "<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges]
    )


def tower_config(layers, **fields):
    """A text or image tower's config: width 32, MLP width 64, 4 heads, ``layers`` layers, and ``fields``."""
    return dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, **fields
    )


def seeded_model(model_class, config, *, seed, attn):
    """``model_class(config)`` initialized under ``torch.manual_seed(seed)``, with attention ``attn``."""
    torch.manual_seed(seed)
    model = model_class(config)
    model.set_attn_implementation(attn)
    return model


def clip_model(*, eos_token_id=VOCAB - 1, attn="sdpa", seed=0, layers=3):
    """A 3-layer CLIP: text width 32, 4 heads, 32 positions; 32x32 images in 8x8 patches; D = 24."""
    config = transformers.CLIPConfig(
        text_config=tower_config(
            layers,
            vocab_size=VOCAB,
            max_position_embeddings=CONTEXT_LENGTH,
            eos_token_id=eos_token_id,
            bos_token_id=VOCAB - 2,
            pad_token_id=VOCAB - 1,
        ),
        vision_config=tower_config(layers, image_size=32, patch_size=8),
        projection_dim=24,
    )
    model = seeded_model(transformers.CLIPModel, config, seed=seed, attn=attn)
    return model.eval()


def siglip_model(*, attn="sdpa", seed=0):
    """A 2-layer SigLIP: width 32, 16 positions (the text is always padded to all of them)."""
    config = transformers.SiglipConfig(
        text_config=tower_config(
            2,
            vocab_size=100,
            max_position_embeddings=16,
            projection_size=32,
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=tower_config(2, image_size=32, patch_size=8),
    )
    model = seeded_model(transformers.SiglipModel, config, seed=seed, attn=attn)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-10.0)
    return model.eval()


def save_clip_folder(folder, **options):
    """A ``save_pretrained`` folder of a tiny CLIP with its tokenizer and image processor."""
    model = clip_model(**options)
    model.save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return model
