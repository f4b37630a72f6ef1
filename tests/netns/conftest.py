"""The LAN fixture of the namespace tests, and each host's log in the report of a failed test."""

from collections.abc import Generator, Iterator

import pytest

from tests.helpers.netns import Lan

Report = pytest.TestReport
LOG_TAIL = 4000  # characters of each host's node log in a failure report


@pytest.fixture
def lan(request: pytest.FixtureRequest) -> Iterator[Lan]:
    network = Lan()
    request.node.shoal_lan = network  # for the report hook below
    try:
        yield network
    finally:
        network.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, Report, Report]:
    """A failed test's report carries the tail of every host's node log: the only record of why a
    node never joined or answered, on a machine where the test ran once."""
    report = yield
    network = getattr(item, "shoal_lan", None)
    if report.failed and isinstance(network, Lan):
        for host in network.hosts:
            report.sections.append((f"{host.ns} node log", host.log()[-LOG_TAIL:]))
    return report
