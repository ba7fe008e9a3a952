"""The component's entry point: componentize-py looks for ``PackedSink`` in this module."""

from fanout_sdk.component import export_sink

from device_counter import DeviceCounter

PackedSink = export_sink(DeviceCounter)
