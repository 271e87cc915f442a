"""Home Assistant's MQTT discovery schema, for the components the recorder uses (sensor, binary_sensor), written out
as JSON Schema from Home Assistant's own source so that tests check every payload the daemon publishes:

- homeassistant/components/mqtt/discovery.py: TOPIC_MATCHER, `<prefix>/<component>/[<node_id>/]<object_id>/config`
  with node_id and object_id of [a-zA-Z0-9_-]+;
- homeassistant/components/mqtt/schemas.py: MQTT_ENTITY_COMMON_SCHEMA (availability single or list, device with at
  least one identifier or connection, origin with a required name, entity_category, json_attributes_*, unique_id...);
- homeassistant/components/mqtt/config.py: MQTT_RO_SCHEMA (state_topic required, value_template, qos, encoding);
- homeassistant/components/mqtt/sensor.py and binary_sensor.py: the PLATFORM_SCHEMA of each (device_class,
  expire_after a positive int, state_class, unit_of_measurement, off_delay, payload_on/off...);
- homeassistant/components/sensor/const.py: the device classes, their units (DEVICE_CLASS_UNITS) and allowed state
  classes (DEVICE_CLASS_STATE_CLASSES), for the classes used here.

Home Assistant itself drops unknown keys silently (DISCOVERY_SCHEMA has extra=REMOVE_EXTRA), which hides a misspelt
option; these schemas forbid them, so a typo fails here instead of being ignored there.
"""

from __future__ import annotations

import json
import re

import jsonschema

#: discovery.py's TOPIC_MATCHER, after the discovery prefix
TOPIC = r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config"
_TOPIC_STR = {"type": "string", "minLength": 1, "not": {"pattern": "[#+]"}}  # valid_publish/subscribe_topic
_TEMPLATE = {"type": "string"}

_AVAILABILITY_ITEM = {
    "type": "object", "additionalProperties": False, "required": ["topic"],
    "properties": {"topic": _TOPIC_STR, "payload_available": {"type": "string"},
                   "payload_not_available": {"type": "string"}, "value_template": _TEMPLATE},
}
_DEVICE = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "identifiers": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "connections": {"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                                    "items": {"type": "string"}}},
        "manufacturer": {"type": "string"}, "model": {"type": "string"}, "model_id": {"type": "string"},
        "name": {"type": "string"}, "hw_version": {"type": "string"}, "serial_number": {"type": "string"},
        "sw_version": {"type": "string"}, "via_device": {"type": "string"}, "suggested_area": {"type": "string"},
        "configuration_url": {"type": "string"},
    },
    "anyOf": [{"required": ["identifiers"], "properties": {"identifiers": {"minLength": 1, "minItems": 1}}},
              {"required": ["connections"], "properties": {"connections": {"minItems": 1}}}],
}
_ORIGIN = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}, "sw_version": {"type": "string"},
                   "support_url": {"type": "string", "pattern": "^https?://"}},
}
_COMMON = {
    # MQTT_AVAILABILITY_SCHEMA: availability_topic and availability are exclusive
    "availability_topic": _TOPIC_STR, "availability_template": _TEMPLATE, "payload_available": {"type": "string"},
    "payload_not_available": {"type": "string"}, "availability_mode": {"enum": ["all", "any", "latest"]},
    "availability": {"type": "array", "items": _AVAILABILITY_ITEM},
    # MQTT_ENTITY_COMMON_SCHEMA
    "device": _DEVICE, "origin": _ORIGIN, "enabled_by_default": {"type": "boolean"},
    "entity_category": {"enum": ["config", "diagnostic"]}, "icon": {"type": "string", "pattern": "^[a-z-]+:"},
    "json_attributes_topic": _TOPIC_STR, "json_attributes_template": _TEMPLATE, "object_id": {"type": "string"},
    "unique_id": {"type": "string"}, "entity_picture": {"type": "string"},
    # MQTT_RO_SCHEMA / MQTT_BASE_SCHEMA
    "state_topic": _TOPIC_STR, "value_template": _TEMPLATE, "qos": {"enum": [0, 1, 2]},
    "encoding": {"type": "string"}, "name": {"type": ["string", "null"]},
    "force_update": {"type": "boolean"}, "expire_after": {"type": "integer", "minimum": 0},
}

#: SensorDeviceClass values used here, with their units (DEVICE_CLASS_UNITS) and state classes
#: (DEVICE_CLASS_STATE_CLASSES) from homeassistant/components/sensor/const.py.
SENSOR_DEVICE_CLASSES = {
    "duration": ({"d", "h", "min", "s", "ms", "µs"}, {"measurement", "total", "total_increasing"}),
    "temperature": ({"°C", "°F", "K"}, {"measurement"}),
    "data_size": ({"bit", "kbit", "Mbit", "Gbit", "B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB", "KiB", "MiB",
                   "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"}, {"measurement", "total", "total_increasing"}),
}
BINARY_SENSOR_DEVICE_CLASSES = [
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door", "garage_door", "gas", "heat",
    "light", "lock", "moisture", "motion", "moving", "occupancy", "opening", "plug", "power", "presence", "problem",
    "running", "safety", "smoke", "sound", "tamper", "update", "vibration", "window",
]

SCHEMAS = {
    "sensor": {
        "type": "object", "additionalProperties": False, "required": ["state_topic"],
        "not": {"required": ["availability", "availability_topic"]},
        "properties": {**_COMMON,
                       "device_class": {"enum": sorted(SENSOR_DEVICE_CLASSES)},
                       "state_class": {"enum": ["measurement", "measurement_angle", "total", "total_increasing"]},
                       "unit_of_measurement": {"type": "string"},
                       "suggested_display_precision": {"type": "integer", "minimum": 0},
                       "last_reset_value_template": _TEMPLATE,
                       "options": {"type": "array", "items": {"type": "string"}}},
    },
    "binary_sensor": {
        "type": "object", "additionalProperties": False, "required": ["state_topic"],
        "not": {"required": ["availability", "availability_topic"]},
        "properties": {**_COMMON,
                       "device_class": {"enum": BINARY_SENSOR_DEVICE_CLASSES},
                       "off_delay": {"type": "integer", "minimum": 0},
                       "payload_on": {"type": "string"}, "payload_off": {"type": "string"}},
    },
}


def check(topic: str, payload: str, prefix: str = "homeassistant") -> tuple[str, dict]:
    """Raise AssertionError (naming the topic) unless `payload` is a valid discovery config for `topic`'s component.
    Returns (component, config)."""
    m = re.fullmatch(re.escape(prefix) + "/" + TOPIC, topic)
    assert m, f"{topic}: not a discovery topic Home Assistant matches"
    component = m.group("component")
    assert component in SCHEMAS, f"{topic}: component {component} has no schema here"
    config = json.loads(payload)
    try:
        jsonschema.validate(config, SCHEMAS[component])
    except jsonschema.ValidationError as e:
        raise AssertionError(f"{topic}: {e.message} at {list(e.absolute_path)}") from None
    if component == "sensor" and "device_class" in config:
        units, state_classes = SENSOR_DEVICE_CLASSES[config["device_class"]]
        assert config.get("unit_of_measurement") in units, f"{topic}: unit not valid for {config['device_class']}"
        if "state_class" in config:
            assert config["state_class"] in state_classes, f"{topic}: state_class not valid for the device class"
    return component, config
