"""verl's custom reward for examples/verl_grpo_arith.py: parity's `last_numbers` reward (the last integer of
the reply is the sum). Its own small file because verl's workers load it by path without registering the
module (`verl.utils.import_utils.load_extern_object`), which a module defining dataclasses does not survive."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """verl hands over the decoded reply without its EOS, so a truncated reply is not told apart here."""
    from parity.train.tasks import Problem, score

    return score(Problem(prompt="", answer=str(ground_truth)), solution_str, "stop", "last_numbers")
