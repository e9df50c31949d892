"""The ASGI application uvicorn serves (`blastq serve`): the review station on the settings of this process."""

from blastq.core.adapters import load_settings
from blastq.web.app import create_app

app = create_app(load_settings())
