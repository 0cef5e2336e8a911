"""Adapters for training frameworks, one module each; each imports only its own framework, so ``import
selective_backprop`` imports none of them. :mod:`selective_backprop.integrations.lightning`: PyTorch Lightning
(``pip install 'selective-backprop[lightning]'``)."""
