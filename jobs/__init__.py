"""rpq: hand GPU jobs from web apps to RunPod serverless endpoints through Celery.

`jobs` holds the domain: settings, the RunPod client, the local RunPod simulator and the CLI.
"""
