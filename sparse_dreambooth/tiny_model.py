"""A tiny Stable Diffusion XL, built from code, for tests and CPU smoke runs.

Every component has SDXL's architecture and SDXL's module names (so adapters attach to exactly the
layers they would on the real model) but channel counts small enough that a full training step at
64x64 px takes a fraction of a second on a laptop CPU. Nothing is downloaded: the tokenizers are
generated here too. The weights are random, so images are noise; what matters is that every code
path (conditioning, VAE scaling, scheduler, saving, loading) is the real one.
"""

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Bump whenever anything below changes what gets built, so stale caches are not reused.
TINY_MODEL_VERSION = "v1"

# Hidden sizes of the two text encoders. They differ (as SDXL's 768 and 1280 do) so that mixing up
# the encoders fails loudly on shapes instead of passing silently.
TEXT_ENCODER_DIM = 32
TEXT_ENCODER_2_DIM = 64
ADDITION_TIME_EMBED_DIM = 8

MAX_PROMPT_TOKENS = 77
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# Words that each become a single token: every word of the DreamBooth prompt lists and classes,
# the usual rare-token identifiers, and everyday words for captions and negative prompts.
# Anything else still encodes, one byte-level character per token.
VOCABULARY_WORDS = """
a an the of in on at to with and or by for from into around near under over behind next top
is it its this that there his her their my your our
in the jungle snow beach cobblestone street pink fabric wooden floor city background mountain
blue house purple rug forest wheat field tree autumn leaves eiffel tower floating water ocean milk
green grass sunflowers mirror sidewalk crowded dirt road white red shiny wet cube shaped
wearing hat santa rainbow scarf black monocle chef outfit firefighter police glasses yellow shirt
wizard
backpack stuffed animal bowl can candle cat clock sneaker dog toy boot glasses cartoon teapot vase
plushie bear berry sloth monster emoji robot car duck wolf poop sunglasses colorful fancy grey
zjw sks ohwx
photo photograph picture image painting drawing sketch illustration render portrait close up view
high quality best detailed sharp focus realistic studio lighting light dark night day sun sunset
sky cloud clouds rain room table kitchen garden park lake river sea sand rock stone wall window
door chair sofa bed book cup plate box bag ball flower flowers bird horse fish person man woman
child
small big large tiny old new cute happy sad sitting standing lying running jumping looking
orange brown gold silver golden gray
blurry blur low worst bad ugly deformed distorted disfigured watermark text signature logo
cropped noisy jpeg artifacts duplicate extra missing lowres error
""".split()


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Builds the tiny SDXL pipeline in memory.

    Each component is initialised right after `torch.manual_seed(seed)` inside a forked RNG, so
    the weights depend only on `seed` (and the torch version), not on build order or on whatever
    the caller did with the global RNG before.

    Args:
        seed: Seed for every component's random initialisation. Default: 0.

    Returns:
        A `StableDiffusionXLPipeline` whose default resolution is 64x64 px.
    """
    tokenizer, tokenizer_2 = _build_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_unet_config())
        torch.manual_seed(seed)
        vae = AutoencoderKL(**_vae_config())
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_encoder_config(tokenizer, TEXT_ENCODER_DIM, "quick_gelu"))
        torch.manual_seed(seed)
        text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(tokenizer_2, TEXT_ENCODER_2_DIM, "gelu"))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_scheduler_config()),
        # The watermarker is an optional extra; leave it off so the pipeline behaves the same everywhere.
        add_watermarker=False,
    )


def _unet_config() -> dict:
    # SDXL base: channels (320, 640, 1280), 5/10/20 heads of 64 dims, (1, 2, 10) transformer layers,
    # 256-dim time ids. Here: the same block layout with 16-dim heads and far fewer channels.
    return dict(
        sample_size=8,  # latent size, so the pipeline's default resolution is 8 * 8 = 64 px
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        # diffusers reads SDXL's `attention_head_dim` as the number of heads; keep its convention.
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 2),
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=TEXT_ENCODER_DIM + TEXT_ENCODER_2_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        # pooled text embedding + six time ids (original size, crop corner, target size)
        projection_class_embeddings_input_dim=TEXT_ENCODER_2_DIM + 6 * ADDITION_TIME_EMBED_DIM,
    )


def _vae_config() -> dict:
    # Four blocks give SDXL's 8x downsampling; scaling factor and upcasting are SDXL's.
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def _text_encoder_config(tokenizer: CLIPTokenizer, hidden_size: int, hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,  # SDXL's text_encoder_2 projects 1280 -> 1280
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _scheduler_config() -> dict:
    # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )


def _build_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    # SDXL's two tokenizers share CLIP's vocabulary and differ only in the padding token.
    vocab, merges = _clip_vocab_and_merges(VOCABULARY_WORDS)
    shared = dict(vocab=vocab, merges=merges, model_max_length=MAX_PROMPT_TOKENS)
    return CLIPTokenizer(pad_token=END_TOKEN, **shared), CLIPTokenizer(pad_token="!", **shared)


def _clip_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary in which each of `words` is a single token.

    Laid out like CLIP's: the 256 byte symbols, the same with the end-of-word marker, the merge
    results, then the start and end tokens last (so they have the highest ids, as in CLIP).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [symbol + END_OF_WORD for symbol in alphabet]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):  # de-duplicated, first occurrence order
        pieces = _apply_merges(word, merges)
        # A merge appended last only fires once every earlier merge is exhausted, so words that
        # are already single tokens keep their tokenisation.
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            tokens.append(pieces[0] + pieces[1])
            pieces = _apply_merges(word, merges)
    tokens += [START_TOKEN, END_TOKEN]
    return {token: token_id for token_id, token in enumerate(tokens)}, merges


def _apply_merges(word: str, merges: list[tuple[str, str]]) -> list[str]:
    # BPE as the tokenizers library applies it: repeatedly merge the adjacent pair of lowest rank.
    rank = {pair: index for index, pair in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(pieces) > 1:
        pairs = [(rank.get(pair, len(rank)), index) for index, pair in enumerate(zip(pieces, pieces[1:], strict=False))]
        best_rank, index = min(pairs)
        if best_rank == len(rank):
            break
        pieces[index : index + 2] = [pieces[index] + pieces[index + 1]]
    return pieces
