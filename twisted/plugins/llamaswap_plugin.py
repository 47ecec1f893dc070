from twisted.application.service import ServiceMaker

llamaswap = ServiceMaker(
    "llamaswap",
    "llamaswap.tap",
    "A model-swapping reverse proxy for local AI inference servers.",
    "llamaswap",
)
