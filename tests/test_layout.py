import torch

from mitigate.context import build_layout


def test_layout_left_padding_and_text_only_row():
    # row 0: pad pad BOS U I I Q Q ; row 1: BOS U Q Q Q Q Q Q (no image) ; row 2: I I at start, then query
    image = torch.tensor(
        [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8, [1] * 8])
    layout = build_layout(image, mask)
    assert layout.first_image.tolist() == [4, -1, 0]
    assert layout.last_image.tolist() == [5, -1, 1]
    assert layout.prefix.int().tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0] * 8, [0] * 8]
    assert layout.query.int().tolist() == [[0, 0, 0, 0, 0, 0, 1, 1], [1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]]
    rows = layout.rows_after_image(torch.arange(5, 9))
    assert rows.int().tolist() == [[0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    keys = layout.keys("image", 10)
    assert keys.shape == (3, 10) and not keys[:, 8:].any()
    assert layout.keys("image", 4).shape == (3, 4)
    assert layout.keys("image", 3, offset=5).int().tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_layout_ignores_image_ids_in_padding():
    image = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    layout = build_layout(image, torch.tensor([[0, 1, 1, 1]]))
    assert layout.image.int().tolist() == [[0, 0, 1, 0]]
    assert layout.first_image.tolist() == [2]
