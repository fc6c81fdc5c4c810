from flows.report import throughput


def test_a_stage_rate_is_shown_in_the_unit_it_was_logged_in():
    assert throughput({"tokens_per_s": 21345.6, "train_loss": 1.2}) == "21,346 tokens/s"
    assert throughput({"target_tokens_per_s": 900.0}) == "900 target tokens/s"
    assert throughput({"images_per_s": 1234.0, "seconds": 3.0}) == "1,234 images/s"
    assert throughput({"examples_per_s": 0.3456}) == "0.35 examples/s"  # SHAP: a few a second
    assert throughput({"examples_per_s": 12.34}) == "12.3 examples/s"


def test_a_stage_that_logs_no_rate_shows_a_dash():
    assert throughput({"seconds": 4.0, "accuracy": 0.9}) == "–"
    assert throughput({}) == "–"
