"""Model families of t2t-viz, registered into timm's registry on import."""
from .checkpoint_io import CheckpointError, read_checkpoint
from .paper_weights import PAPER_VIT_TAG
from .t2t_vit import T2TStage, T2TViT, TokensToToken, checkpoint_filter_fn, sinusoid_position_table

T2T_VIT_VARIANTS = (
    't2t_vit_7', 't2t_vit_10', 't2t_vit_12', 't2t_vit_14', 't2t_vit_19', 't2t_vit_24',
    't2t_vit_t_14', 't2t_vit_t_19', 't2t_vit_t_24',
)
