"""The inference engine: a loaded model that embeds text and audio.

    clap.py        `Clap`: one model and its front end on one device at one precision; embed_text (with its
                   cache), embed_audio, embed_waveforms, embed_files, save
    streaming.py   `embed_files` for window models (CLAP): files streamed block by block, windows embedded
                   in batches as they complete
    whole_clip.py  Wav2CLIP's path: each clip embedded whole, plus 1 s segments
    load.py        `load_model`, `load_classifier` (the façade `clapcli.load_model` points here)

The result types (`AudioEmbedding`, `Segment`) live in `clapcli.records`, below every floor that uses them.
Nothing is imported here, so `import clapcli.engine` stays light: import the module that holds a name.

    from clapcli import load_model
    m = load_model("laion/clap-htsat-fused")          # hub id, local directory or LAION .pt
    a = m.embed_audio(["kick.wav", "rain.flac"])       # (2, 512), L2-normalised
    t = m.embed_text(["a kick drum", "rain"])           # (2, 512)
    scores = a @ t.T

Audio rules (see the docs, "How audio is embedded"): decode → mono → 48 kHz → int16 round trip; clips
≤ 10 s are repeat-padded; a fused model embeds a longer file in one pass with feature fusion, an
unfused one as the normalised mean of full-coverage 10 s windows. Files longer than 10 s also get
one embedding per window ("segments"), the last window aligned to the file end.
"""
