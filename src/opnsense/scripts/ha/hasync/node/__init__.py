"""Changes to this node beyond config.xml: reconfiguring after a change, rollback."""
