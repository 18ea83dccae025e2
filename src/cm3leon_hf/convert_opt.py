"""CM3Leon as transformers' `OPTForCausalLM`: the same function, in the architecture every engine knows.

CM3Leon is OPT with a few switches set (CL §2.3: pre-LN, no bias terms, no LayerNorm parameters, ReLU, tied LM head),
so `OPTForCausalLM` configured that way computes our logits once our weights are mapped onto it. The mapping is the
parity test's (`tests/test_modeling_cm3leon.py` compares the logits) and the benchmark's opponent (`bench/model.py`).
"""

from transformers import OPTConfig, OPTForCausalLM


def to_opt(model) -> OPTForCausalLM:
    """transformers' OPT configured as CM3Leon (pre-LN, no bias, no LN affine, ReLU, tied head) with our weights.

    Exporting to OPT also lets an engine that serves OPT run the model, unguided: it computes the same next-token
    logits over the joint vocabulary, but classifier-free guidance, contrastive decoding and the image-token constraint
    live in `Cm3LeonForCausalLM.generate` and are not part of an OPT checkpoint. OPT keeps two spare position rows in
    front (our position `p` is its row `p + 2`); they keep OPT's initialisation, and OPT reads one of them only at
padded positions.

    Args:
        model (`Cm3LeonForCausalLM`): the model to export; it is not changed.

    Returns:
        `OPTForCausalLM` in evaluation mode, with the same logits for the same (unpacked) input.

    Example:

    ```python
    >>> import tempfile
    >>> import torch
    >>> from transformers import AutoModelForCausalLM
    >>> from cm3leon_hf import HUB_CONFIGS, Cm3LeonConfig, Cm3LeonForCausalLM
    >>> from cm3leon_hf.convert_opt import to_opt

    >>> model = Cm3LeonForCausalLM(Cm3LeonConfig.from_pretrained(HUB_CONFIGS / "cm3leon-tiny")).eval()
    >>> opt = to_opt(model)
    >>> ids = torch.tensor([[1, 300, 301, 2]])  # <eos> text <break>
    >>> torch.allclose(model(ids).logits, opt(ids).logits, atol=1e-5)
    True
    >>> with tempfile.TemporaryDirectory() as path:  # a plain OPT checkpoint, no remote code
    ...     opt.save_pretrained(path)
    ...     type(AutoModelForCausalLM.from_pretrained(path)).__name__
    'OPTForCausalLM'

    ```
    """
    c = model.config
    opt_config = OPTConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        word_embed_proj_dim=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        ffn_dim=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        activation_function="relu",
        do_layer_norm_before=True,
        enable_bias=False,
        layer_norm_elementwise_affine=False,
        dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
    )
    opt = OPTForCausalLM(opt_config).eval()
    ours = model.state_dict()
    positions = opt.model.decoder.embed_positions.weight.detach().clone()
    positions[2:] = ours["model.embed_positions.weight"]  # OPT keeps two spare rows in front
    mapped = {
        "model.decoder.embed_tokens.weight": ours["model.embed_tokens.weight"],
        "model.decoder.embed_positions.weight": positions,
        "lm_head.weight": ours["lm_head.weight"],
    }
    for key, value in ours.items():
        if key.startswith("model.layers."):
            mapped["model.decoder.layers." + key.removeprefix("model.layers.")] = value
    opt.load_state_dict(mapped, strict=True)
    return opt


__all__ = ["to_opt"]
