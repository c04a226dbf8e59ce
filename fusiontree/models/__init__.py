from fusiontree.models.attention import LocalGlobalAttention
from fusiontree.models.block import GateFusion, HybridBlock
from fusiontree.models.cache import KVCache, MambaStates
from fusiontree.models.hybrid import HybridLanguageModel, HybridOutput
from fusiontree.models.mamba2 import Mamba2Mixer
from fusiontree.models.positions import SRTE, RotaryPositionalEmbedding

__all__ = ["LocalGlobalAttention", "GateFusion", "HybridBlock", "KVCache", "MambaStates",
           "HybridLanguageModel", "HybridOutput", "Mamba2Mixer", "SRTE", "RotaryPositionalEmbedding"]
