"""Small broken plug-ins: each is a learner's file with one defect that is not about the math.
meta_tests/test_learner_run.py runs the suite on each and requires the one sentence that names it."""
