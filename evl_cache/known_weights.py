"""The OpenAI CLIP releases whose TorchScript archives evl-cache loads without being told to trust them.

A TorchScript archive is code as well as weights, so only these exact files (by sha256) are
loaded unasked; any other TorchScript file needs ``--trust-torchscript``. The hashes are the
sha256 of each released file, the same value OpenAI's download URLs carry in their path
(``https://openaipublic.azureedge.net/clip/models/<sha256>/<file>``), written here as data.
"""

from __future__ import annotations

# release file name -> sha256 of the file (lower-case hex)
OPENAI_CLIP_RELEASES: dict[str, str] = {
    "RN50.pt": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    "RN101.pt": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
    "RN50x4.pt": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
    "RN50x16.pt": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
    "RN50x64.pt": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
    "ViT-B-32.pt": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B-16.pt": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L-14.pt": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L-14-336px.pt": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}


def known_release(sha256: str) -> str | None:
    """The OpenAI release name whose file has this sha256, or None."""
    digest = sha256.lower()
    for name, known in OPENAI_CLIP_RELEASES.items():
        if known == digest:
            return name
    return None
