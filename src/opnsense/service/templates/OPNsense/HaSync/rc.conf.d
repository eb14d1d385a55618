{# /etc/rc.conf.d/opnsense_ha, from <OPNsense><opnsense_ha> (opnsense-ha agent set).
   rc.d sources this file as root: every value is shell-quoted. #}
{% set agent = helpers.getNodeByTag('OPNsense.opnsense_ha') or {} %}
{% set address = agent.listen|default('', true) or '0.0.0.0' %}
{% set port = agent.port|default('', true) or '8443' %}
{% set listen = ('[' ~ address ~ ']' if ':' in address else address) ~ ':' ~ port %}
opnsense_ha_enable="{{ 'YES' if agent.enabled|default('0') == '1' else 'NO' }}"
opnsense_ha_listen={{ listen|shlex_quote }}
opnsense_ha_certref={{ agent.certref|default('', true)|shlex_quote }}
