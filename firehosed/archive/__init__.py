"""The daily archive (format "zip-csv"): a day's calendar (days.py); the zip itself is a
format (formats/zipcsv.py)."""
