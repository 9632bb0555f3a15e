"""What a run shows while it trains: a bar on a terminal, plain lines in a log."""
def test_progress_is_plain_lines_in_a_log_and_a_bar_on_a_terminal():
    import io

    from chatts_train.training.metrics import Progress

    row = dict(epoch=0.5, loss=1.25, lr=1e-4, loss_scale=65536.0, tokens_per_s_per_gpu=7512.3, peak_reserved_gib=[40.1])
    log = io.StringIO()
    progress = Progress(4, 0, True, every_s=3600, stream=log)
    for _ in range(4):
        progress.update(row)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2  # the first step, then (an hour apart) the last
    assert lines[0].startswith("[train] step 1/4, epoch 0.5, loss 1.2500, 7,512 tokens/s per GPU, ETA")
    assert lines[1].startswith("[train] step 4/4") and lines[1].endswith("ETA 0.0 min")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    progress = Progress(4, 0, True, stream=term)
    progress.update(row)
    progress.close()
    assert "[train]" not in term.getvalue() and "\r" in term.getvalue() and "tok_s=7512.3" in term.getvalue()
    quiet = io.StringIO()
    Progress(4, 0, False, stream=quiet).update(row)  # other ranks
    assert quiet.getvalue() == ""
