# BSD make: the opnsense/plugins build (place this directory as <category>/opnsense-ha/ in a
# checkout of opnsense/plugins; `make package`, `make install DESTDIR=...`, `make plist`).
# GNU make reads GNUmakefile first: the development targets (make test, make demo, ...).
PLUGIN_NAME=		opnsense-ha
PLUGIN_VERSION=		0.1.0
PLUGIN_REVISION=	0
PLUGIN_COMMENT=		HA config sync engine, backup agent and CARP control
PLUGIN_DEPENDS=		py${PLUGIN_PYTHON}-lxml \
			py${PLUGIN_PYTHON}-jsonschema \
			py${PLUGIN_PYTHON}-bcrypt \
			py${PLUGIN_PYTHON}-passlib \
			py${PLUGIN_PYTHON}-cryptography
PLUGIN_MAINTAINER=	maintainers@users.noreply.r-seed-99023a66.example
PLUGIN_WWW=		https://r-seed-99023a66.example/opnsense-ha

.if !exists(${.CURDIR}/../../Mk/plugins.mk)
.error This is an opnsense/plugins plugin: place it as <category>/opnsense-ha/ in a checkout of opnsense/plugins (README: Deploy on OPNsense). Development targets (test, demo, lint, bench): GNU make (gmake).
.endif

.include "../../Mk/plugins.mk"
