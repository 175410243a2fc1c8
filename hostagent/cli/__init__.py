"""The seed's command-line tools: vserver, chcontext, reducecap, ..."""
