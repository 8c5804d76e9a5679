"""Thin layers over :class:`trimtab.Run` for training frameworks.

* ``trimtab.integrations.lightning.TrimtabCallback`` for PyTorch Lightning;
* ``trimtab.integrations.transformers.TrimtabCallback`` for the Hugging Face ``Trainer``.

Each imports its framework, so import the one you use.
"""
