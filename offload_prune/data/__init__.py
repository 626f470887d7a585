"""Text in: calibration and evaluation text, local files or datasets, tokenized and cut into windows
(calibration).

Imports: config only.
"""
