"""Models: the built-in tiny ones (:mod:`.tiny`, :mod:`.vlm`), pretrained ones by name, GGUF file, directory
or hub id (:mod:`.sources`, :mod:`.loading`), where and how they compute (:mod:`.device`), their special
tokens (:mod:`.tokens`), log-probs of completions (:mod:`.logprobs`) and image prompts (:mod:`.multimodal`)."""
