"""The paper's ablations as named model overrides for `configs/demo.py:ablations`.

Each entry sets fields of `config.model` (see `StabConfig` and `DistillConfig`); the table and
figure in the demo report put the variants beside the released model, trained on the same
data with the same steps and seeds.
"""

ABLATIONS = {
    # Table 4: the STAB's components.
    'no_lste': {'stab.lste': False},
    'no_gstra': {'stab.gstra': False},
    'no_fsra': {'stab.fsra': False},
    'no_row_token': {'stab.row_token': False},
    # Table 5: where and how the frame is downsampled.
    'lsd_before_lste': {'stab.lsd_position': 'before'},
    'avgpool': {'stab.downsample': 'avgpool'},
    'no_downsampling': {'stab.downsample': 'none'},
    # Tables 8-10: the distillation loss.
    'mse_distill': {'distill.loss': 'mse'},
    'no_distill': {'distill.loss': 'none'},
}
