"""Placeholder replaced below."""
def write_study_report(params):
    raise NotImplementedError
