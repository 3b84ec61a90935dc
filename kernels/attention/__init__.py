"""Causal GQA attention over a KV cache: the Pallas Mosaic GPU kernel (the reference is
`nemojax.attention.attend`)."""
