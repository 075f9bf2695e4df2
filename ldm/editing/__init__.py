"""Editing and inspecting generations through the U-Net's attention.

    attention maps        generate_with_attention_maps(pipe, prompt, ...) → (result, maps, labels)
    Prompt-to-Prompt      prompt_to_prompt(pipe, source, target, edit=...) → result [source, edit]
    Attend-and-Excite     attend_and_excite(pipe, prompt, words, ...) → (result, per-step losses)

All three act through attention controllers (`controllers`), which see each layer's probabilities only while
installed, and sample with the pipeline's `generate(..., shared_noise=True)`: every prompt from one seed's noise.
"""

from ldm.editing.attend_excite import AttendExcite, attend_and_excite, gaussian_kernel
from ldm.editing.attention_maps import (
    CrossAttentionStore,
    content_positions,
    generate_with_attention_maps,
    step_range,
    token_indices,
)
from ldm.editing.controllers import (
    AttentionController,
    ControllerChain,
    attention_layer_strides,
    cross_attention_grids,
    default_attention_grid,
    select_layers,
    use_controller,
)
from ldm.editing.figures import attention_figure, edit_figure, save_attention_figure, save_edit_figure
from ldm.editing.prompt_to_prompt import LocalBlend, PromptToPromptController, prompt_to_prompt
from ldm.editing.seq_aligner import global_alignment, refinement_mapper, replacement_mapper

__all__ = [
    "AttendExcite",
    "AttentionController",
    "ControllerChain",
    "CrossAttentionStore",
    "LocalBlend",
    "PromptToPromptController",
    "attend_and_excite",
    "attention_figure",
    "attention_layer_strides",
    "content_positions",
    "cross_attention_grids",
    "default_attention_grid",
    "edit_figure",
    "gaussian_kernel",
    "generate_with_attention_maps",
    "global_alignment",
    "prompt_to_prompt",
    "refinement_mapper",
    "replacement_mapper",
    "save_attention_figure",
    "save_edit_figure",
    "select_layers",
    "step_range",
    "token_indices",
    "use_controller",
]
