"""nipype graph builders (``init_*_wf``); no numerical code lives here."""
