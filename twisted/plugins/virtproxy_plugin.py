"""twistd plugin: ``twistd [-n] virtproxy --channel SPEC ...``.

Same options and help as the ``virtproxy`` command.  twistd imports every
plugin module just to list them, so this one imports neither the reactor nor
``virtproxy.service`` until ``makeService`` runs: twistd installs the reactor
(``--reactor``) after parsing options.
"""

from __future__ import annotations

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from virtproxy.options import TwistdOptions


@implementer(IServiceMaker, IPlugin)
class VirtproxyServiceMaker:
    """Builds the daemon's services from parsed :class:`TwistdOptions`."""

    tapname = "virtproxy"
    description = "Proxy and multiplex socket streams over one VM host/guest channel."
    options = TwistdOptions

    def makeService(self, options: TwistdOptions) -> IService:
        """Wrap ``make_service`` so a StartupError becomes one line, not a traceback."""
        from virtproxy.cli import StartupGuard
        from virtproxy.service import make_process_service

        if options.subCommand == "ctl":
            from virtproxy.cli import report_error

            report_error("use 'virtproxy ctl' (or python -m virtproxy ctl), not twistd, for ctl")
            raise SystemExit(2)
        return StartupGuard(make_process_service(options.process), options.parent)


serviceMaker = VirtproxyServiceMaker()
